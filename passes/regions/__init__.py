"""Linear regions: the analysis that finds them (``analyzer``) and the rules for each family of ops."""
