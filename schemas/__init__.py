"""The contracts of wardwatch: pure, I/O-free data models and functions."""
