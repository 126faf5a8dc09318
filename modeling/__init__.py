"""Model and tokenizer factory, item tokens, LoRA, adversarial perturbation, ranking, export."""
