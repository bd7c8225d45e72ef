"""CPU kernels in C (compiled once per machine by native.py) and their ctypes bindings."""
