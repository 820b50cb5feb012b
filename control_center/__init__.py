"""control_center"""
