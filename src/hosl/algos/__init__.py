"""The five training modes as short explicit step functions over the parties."""
