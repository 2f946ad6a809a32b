"""The query side: GET handlers over read models only."""
