// /docs: Swagger UI over this service's /openapi.json (an external script: the CSP allows no inline one)
"use strict";
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                              presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout" });
