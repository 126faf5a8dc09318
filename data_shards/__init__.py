"""Interaction logs -> leave-one-out split -> WebDataset shards, and the resumable streaming reader."""
