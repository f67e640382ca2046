"""Lightning modules, one module per model family; networks live in zoo.models.components."""
