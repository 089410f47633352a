"""SSL training engine: SSLTrainer (an nnUNetTrainer subclass), data sampling, logging, CLI."""
