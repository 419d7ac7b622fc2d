"""Registry of deployment targets: supported bit widths, scale formats and default budgets."""
