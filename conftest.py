"""Makes the repository importable for pytest and locates the shared reference data."""
