"""Models: every way to load one (aliases, GGUF, folders, LoRA, hub), checkpoint series, hook
names."""
