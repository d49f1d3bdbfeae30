"""Outbound policy: rules decide per recipient (engine), templates supply signatures and disclaimers."""

from gateway.policy.engine import Decision, PolicySet, Settings, Source, load_policies, policies_for
from gateway.policy.rules import Headers
from gateway.policy.templates import Template, render_template

__all__ = ["Decision", "Headers", "PolicySet", "Settings", "Source", "Template", "load_policies",
           "policies_for", "render_template"]
