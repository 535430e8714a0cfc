// Starts Swagger UI on /docs. A file of its own, not an inline script: the page's
// Content-Security-Policy allows scripts from this origin only.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = window.SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    docExpansion: "list",
    defaultModelsExpandDepth: 1,
    displayOperationId: true,
    persistAuthorization: false,
    // The document says which routes take a key: "Authorize" asks for it once for all of them.
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
