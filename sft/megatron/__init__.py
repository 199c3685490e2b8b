"""Megatron-core backend of the cold-start SFT stage (extra `megatron`): weight conversion, model, trainer."""
