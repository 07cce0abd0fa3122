"""resnet50 recipe: models registered by name, a preset (recipe.toml) and launchers."""
