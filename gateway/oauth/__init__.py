"""OAuth2 accounts: presets, token store, grants and refresh."""
