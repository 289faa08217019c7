"""placement_search.evaluators"""
