from trig_stream.console import entry_point

if __name__ == "__main__":
    entry_point()
