"""mobilenet recipe: models registered by name, a preset (recipe.toml) and launchers."""
