"""Glue to the trainers' and model libraries' conventions. Importing prefkern imports none of
them: ``prefkern.integrations.transformers`` reads models through their attributes, and
``prefkern.integrations.trl`` imports trl only when a patch is applied."""

from prefkern.integrations.hf_head import HeadConfig, hf_head_config

__all__ = ["HeadConfig", "hf_head_config"]
