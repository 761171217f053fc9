"""Tasks: loading, splitting and text formatting of the paper's datasets (paper section 4.1; docs/method.md)."""
