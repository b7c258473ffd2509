"""Placeholder: this op module is being written (numpy CPU backend ops)."""
