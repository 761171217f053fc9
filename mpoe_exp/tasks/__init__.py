"""Tasks: loading, splitting and text formatting of the paper's datasets (SPEC section 4)."""
