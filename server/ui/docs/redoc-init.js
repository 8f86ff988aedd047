// Starts ReDoc on /redoc (a file, not an inline script: the page's CSP allows no inline code).
"use strict";
const root = document.getElementById("redoc");
Redoc.init(root.dataset.openapi, {}, root);
