"""Training: data loading, LightningModules and DataModules, the ``attnzoo`` CLI, the demo job."""
