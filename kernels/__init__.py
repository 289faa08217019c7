"""placement_search.kernels"""
