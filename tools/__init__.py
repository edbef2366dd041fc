"""Developer tools shared by bench/ and tests/ (not part of the installed packages)."""
