"""Data: sources, validation and quarantine, the versioned Parquet store, splits, loaders, augmentation."""
