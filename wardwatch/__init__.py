"""wardwatch: streaming early-warning pipeline for hospital wards."""

__version__ = "0.1.0"
