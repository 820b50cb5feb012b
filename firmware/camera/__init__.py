"""firmware/camera"""
