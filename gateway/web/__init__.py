"""The HTTP surface: route handlers stay thin and call the layers below."""
