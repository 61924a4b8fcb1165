"""porting."""
