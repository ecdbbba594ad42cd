"""lvstudio.train"""
