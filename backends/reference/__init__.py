"""Plain-torch reference implementations: the ground truth for every moecc kernel."""

from moecc.backends.reference.moe_layer import moe_layer
from moecc.backends.reference.routing import route, router_logits

__all__ = ["moe_layer", "route", "router_logits"]
