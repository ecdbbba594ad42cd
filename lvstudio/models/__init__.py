"""lvstudio.models"""
