"""embtune: fine-tune text-embedding models with contrastive learning over hard negatives."""

__version__ = "0.1.0"
