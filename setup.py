from setuptools import setup

setup(cffi_modules=["chimney/device/fastpath_build.py:ffibuilder"])
