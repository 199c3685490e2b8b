"""Reward plugins: this directory is the reward drop-in directory (see README.md)."""
