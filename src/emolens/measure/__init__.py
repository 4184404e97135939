"""What needs a model: answer-position activations, concept vectors, steering, attribution,
localisation."""
