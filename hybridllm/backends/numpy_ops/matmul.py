"""MUL_MAT and MUL_MAT_ID on numpy (written by the matmul helper; empty until it lands)."""
