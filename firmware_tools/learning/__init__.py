"""Fleet learning: curate what consenting devices said, adapt the head, gate the candidate, roll it out."""
