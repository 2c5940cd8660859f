"""Real data files in and out: strict loaders, the built panel and charger logs, model files.

Every loader refuses a bad file with a `DataFileError` naming the file, line and column; none
fills a gap or reads a bad cell as NaN.
"""
