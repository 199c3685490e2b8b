"""Cold-start SFT (paper section 3.3, stage 1): InfoNCE on both embeddings plus next-token loss."""
