"""Fine-tuning methods: which parameters of CLIP train and travel."""
