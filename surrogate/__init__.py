"""placement_search.surrogate"""
