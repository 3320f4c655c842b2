"""lightning-bdvax."""
