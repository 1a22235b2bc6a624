"""metrion-addon: a self-hosted cost meter for Anthropic API traffic, as a mitmproxy addon."""

__version__ = "0.1.0"
