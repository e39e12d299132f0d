"""Graph passes over captured MoE graphs (installed as moecc.passes); see pipeline.py."""
