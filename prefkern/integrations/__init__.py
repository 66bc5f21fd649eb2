"""Glue to the trainers' and model libraries' conventions. Never imports them: objects are read
through their attributes."""

from prefkern.integrations.hf_head import HeadConfig, hf_head_config

__all__ = ["HeadConfig", "hf_head_config"]
