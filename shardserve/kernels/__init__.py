"""Native kernels, one package per device kind; nothing here imports the model or anything above it."""
