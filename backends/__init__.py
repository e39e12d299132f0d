"""Kernel backends for the moecc op: reference (plain torch), triton, tvm."""
