"""What GoRA puts into and reads out of a model: GoRALinear, target discovery, a batch's loss,
adapter files in PEFT's format, the PEFT model, GeLoRA's hidden-state hooks."""
